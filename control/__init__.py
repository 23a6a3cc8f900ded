"""toolplane control plane: CLI, services and embedded servers."""
