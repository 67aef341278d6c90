"""The admins' web dashboard: usage, live state, users and the audit log, on its own listener.

`app.dashboard_site` (in the proxy's cleanup_ctx) serves `app.dashboard_app` on
LLAMA_PROXY_DASHBOARD_HOST:LLAMA_PROXY_DASHBOARD_PORT, never on the public API listener. Admins
sign in with a token from `llama-gate create-admin-token`; `guard` keeps every other page behind
that sign-in and every action behind its session's CSRF token.
"""
