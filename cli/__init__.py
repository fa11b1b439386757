"""`qlora`: the service's command line for people. Upload data, create, list, watch and cancel fine-tuning jobs,
download adapters (docs/cli.md).

A client of the public REST API only, built on the openai SDK: it imports nothing of the service and no torch, so
it installs and runs on a laptop that has neither.
"""
