"""The web explorer: a static page (``static/``) that the HTTP gateway serves beside the gap.v1 JSON API."""
