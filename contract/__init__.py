"""The job's contract, shared by the API and the engine: the training options (`options`, `hyperparameters`),
what every 'auto' option becomes on a device (`device_choices`), the base model read from its config.json
(`base_model`, `prequantized`), the training file format (`data_format`), the memory estimate (`memory`), a step's
metrics (`metrics`), the files of a saved adapter (`adapter`) and the job file of both command lines (`job_file`).

Imports no torch, no database, web or queue code, and nothing else of ours, so both sides can import it: the
API validates a job with the same model the engine trains with.
"""
