"""The memory model (one function per phase), the pre-flight check, and measured peaks."""
