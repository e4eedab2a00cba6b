"""Running artifacts through their real runtimes; drift statistics and latency build on this."""
