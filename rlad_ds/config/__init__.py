"""The run's configuration: the dataclass tree (`schema`) and how flags and files become it (`parsing`)."""
