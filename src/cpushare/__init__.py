"""CPUShare: sell idle CPU time safely, buy it cheaply."""

__version__ = "0.1.0"
