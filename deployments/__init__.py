"""Ray Serve applications of the Factory: the HTTP API (``deployments.api``) and the
routing hot path (``deployments.route``). ``deployments.app`` builds both."""
