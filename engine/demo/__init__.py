"""The built-in demo model: a tiny Llama-architecture CodeLlama look-alike trained on Python source.

`corpus` finds the training text (stdlib + permissively licensed packages), `examples` turns it into
CodeLlama-format training sequences (plain, fill-in-the-middle, Instruct), `modeling` is the small
training model saved in Hugging Face Llama layout, `train` runs it all and `evaluate` scores a saved
model on held-out stdlib modules. Only `train`/`evaluate` are entry points; nothing here is imported by
the engine at run time (the engine loads `engine/demo/model/` like any other checkpoint).
"""
