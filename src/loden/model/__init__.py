"""Pure values: configs, leases, subnet keys, subnet.env. Standard library only, no I/O."""
