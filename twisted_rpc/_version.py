"""The version of twisted_rpc (kept apart so modules can read it without the facade)."""

__version__ = "0.1.0"
