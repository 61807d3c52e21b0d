"""The runtime behind the API: node manager, workers, fork server, message transport."""
