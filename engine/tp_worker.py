"""`python -m engine.tp_worker`: a tensor-parallel rank started by rank 0 (engine.tp.launch); reads its job on stdin."""

from engine.tp import worker_main

if __name__ == "__main__":
    worker_main()
