"""An OpenAI-compatible HTTP server over the rollout engine (--stage serve): serve/server.py."""
