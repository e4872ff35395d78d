"""The operators' web console, served by the shim at ``/console`` (admins only).

``routes`` (the pages and actions), ``session`` (login links, session
cookies, CSRF), ``views`` (what a page shows: redaction, charts), the Jinja2
templates in ``templates/`` and the static files in ``worker/shim/static/``.
No build step: server-rendered HTML, htmx (vendored) for the parts that
refresh themselves.
"""
