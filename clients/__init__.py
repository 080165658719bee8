"""Programs that drive a Prefloop server over its v1 HTTP API, like any outside client, through
:class:`prefloop_client.PrefloopClient`: the simulated annotators
(:mod:`clients.simulated_annotator`) and ``make demo`` (:mod:`clients.demo`, which also starts
the server, a worker and beat as child processes). None of them is server or worker code."""
