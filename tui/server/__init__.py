"""`codellama-tui serve`: the OpenAI-compatible HTTP server, one more front end of the client contract.

FastAPI routes (`app`) turn HTTP requests (`schemas`) into engine requests (`prompts`); the bridge (`bridge`) hands
them to the engine's client on its worker thread and brings each event back into the event loop, where the
responses and their server-sent events are built (`responses`). The guard (`guard`) checks keys and body sizes,
`errors` gives every failure OpenAI's JSON shape, `metrics` counts for Prometheus, `run` starts and stops it all,
and `bench` (`codellama-tui bench-serve`) times it through real HTTP clients. Nothing here imports torch: the
engine loads on its worker thread.
"""
