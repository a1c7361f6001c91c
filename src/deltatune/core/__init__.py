"""deltatune's core: the delta contract, registry, targeting, hosts, routing and PEFT-format io."""
