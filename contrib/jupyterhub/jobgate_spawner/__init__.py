"""JupyterHub spawners that reach single-user servers through a jobgate relay."""

from .spawner import JobgateSlurmSpawner, session_url

__all__ = ["JobgateSlurmSpawner", "session_url"]
__version__ = "0.1.0"
