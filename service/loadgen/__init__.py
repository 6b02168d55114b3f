"""The load generator behind `staticmoe bench serve` (a client of the server, kept apart from it): `main` parses
the command line (main.py); client.py streams requests, dataset.py makes prompts, report.py summarises and plots,
scrape.py samples a server's /metrics during a run."""

from service.loadgen.main import main

__all__ = ["main"]
