"""The HTTP shim: validate, authenticate, enqueue commands, answer.

It never changes an order itself.  ``create_app(settings)`` in
:mod:`worker.shim.app` builds the FastAPI application; ``orders shim`` serves
it with uvicorn.
"""
