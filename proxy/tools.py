"""The tools a deployment declares (LLAMA_PROXY_TOOLS_FILE), read once at startup.

JSON-RPC's `tool_list` lists them, and the local-server APIs' requests that name no tools of
their own get them. A tool is `{"name", "description", "parameters"}` (a JSON schema of its
arguments), or OpenAI's `{"type": "function", "function": {...}}`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, model_validator

from proxy.settings import Settings, SettingsError

ToolName = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: ToolName
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object

    @model_validator(mode="before")
    @classmethod
    def _openai_form(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("function"), dict):
            return value["function"]
        return value

    def openai(self) -> dict[str, Any]:
        function = self.model_dump(exclude_none=True)
        return {"type": "function", "function": function}


def load_tools(settings: Settings) -> tuple[Tool, ...]:
    """The tools LLAMA_PROXY_TOOLS_FILE declares (a JSON list of tools, or `{"tools": [...]}`);
    `SettingsError` naming the file and what is wrong with it."""
    if not settings.tools_file:
        return ()
    path = Path(settings.tools_file)
    path = path if path.is_absolute() else settings.home / path
    where = f"LLAMA_PROXY_TOOLS_FILE={settings.tools_file!r}"
    try:
        declared = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"{where}: cannot read {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{where}: {path} is not JSON ({exc})") from None
    if isinstance(declared, dict):
        declared = declared.get("tools")
    if not isinstance(declared, list):
        raise SettingsError(f'{where}: expected a JSON list of tools (or {{"tools": [...]}})')
    tools = []
    for index, item in enumerate(declared):
        try:
            tools.append(Tool.model_validate(item))
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            field = ".".join(str(part) for part in error["loc"])
            raise SettingsError(f"{where}: tool {index}: {field}: {error['msg']}") from None
    names = [tool.name for tool in tools]
    if len(set(names)) != len(names):
        raise SettingsError(f"{where}: two tools have the same name")
    return tuple(tools)
