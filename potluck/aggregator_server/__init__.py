"""The aggregator server: collects peers' updates each round, aggregates them and publishes the result."""
