"""The local mesh: starts every process of meshserve on one machine and stops them cleanly."""
