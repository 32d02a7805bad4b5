"""The station's HTTP API: FastAPI app factory, auth, routers, dashboard, metrics.

Build an app with :func:`api.app.create_app`; ``station serve`` runs it with uvicorn.
"""
