"""The OpenAI-compatible HTTP server: ``lepton serve MODEL`` (args.py) runs the FastAPI app of
api_server.py over an AsyncEngine."""
