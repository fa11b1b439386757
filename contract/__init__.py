"""The job's contract, shared by the API and the engine: the training options (`options`, `hyperparameters`),
the training file format (`data_format`), the memory estimate (`memory`), a step's metrics (`metrics`) and the
files of a saved adapter (`adapter`).

Imports no torch, no database, web or queue code, and nothing else of ours, so both sides can import it: the
API validates a job with the same model the engine trains with.
"""
