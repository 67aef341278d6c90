"""One request's straight walk: route table, authentication, admission, forwarding, outcome, row."""
