"""RED TEAM ONLY: attackers one layer below the updates (streams, joins, records); nodes never import them."""
