"""liflow-screen: high-throughput screening of Li solid-state electrolytes with LiFlow."""

__version__ = "0.1.0"
