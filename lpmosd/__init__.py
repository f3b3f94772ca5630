"""lpmosd: a bare-metal OS provisioning daemon on etcd v3, built on trio."""

__version__ = "0.1.0"
