"""Ray actors that own an engine or a reward, and the group that spreads calls over replicas."""
