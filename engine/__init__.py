"""The decoding engine: everything that turns a request into tokens.

Importing this package (and its `requests`, `events`, `errors`, `client`, `local_client`, `prompts` and
`tokenizer` modules) does not import torch: the UI imports these at start-up and the worker thread imports the
rest when it loads a model.
"""
