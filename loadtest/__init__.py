"""The load-test harness: drives the gRPC services and measures them (``python -m loadtest``).

- ``config``: the run's typed settings and the loopback-only target rule;
- ``schedule``: arrival times (open loop) and ramp steps;
- ``users``: user and item ids from the dataset, Zipf-skewed user sampling with unknown users;
- ``client``: the open-loop, closed-loop and ramp drivers over ``grpc.aio``;
- ``results``: per-request outcomes, percentiles, summaries, JSON;
- ``collector``: the generator's own CPU and garbage-collector pauses, its heap frozen while it measures;
- ``plots``: latency-over-time and histogram PNGs; ``output``: a run's results.json and plots;
- ``compare``: ratios between two result files;
- ``stack``: a loopback stack (own redis-server, both services as subprocesses, an artifact root);
- ``publish``: writes versions into an artifact root (the scenarios' fast publish path);
- ``scenarios``: the table of fault scenarios and their runner;
- ``__main__``: the command line.

The harness is a client: it talks to the services through the stubs of ``recsys_contracts.v1``
and starts them as subprocesses; it never imports the services' code. It may import
``recsys_contracts``, ``recsys_serving`` (the clients' retry policy) and the trainer (``trainer.tiny``
and the loaders, to publish versions); never the test suite (``tests/``), which
``tests/test_import_rules.py`` checks.
"""
