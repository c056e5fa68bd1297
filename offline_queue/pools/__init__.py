"""Infrastructure as code: the cluster's node groups as Prefect work pools, tiers as queues."""
