"""The CPUShare market server (`cpushare-server`): server, store, CA, admin commands."""
