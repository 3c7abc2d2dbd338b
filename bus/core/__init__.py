"""The core layer (sans-io): the broker's decisions -- registry, policy, routing.

It arrives with the broker; like :mod:`bus.wire` it never imports trio.
"""
