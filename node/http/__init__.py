"""HTTP: the user API, the peer API, access control, OpenAPI and the web page."""
