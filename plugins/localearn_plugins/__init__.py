"""First-party rule plugins, registered in pyproject.toml like any third-party plugin."""
