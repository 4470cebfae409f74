"""From recipe to zoo: recipe and space validation, seeding, the plan, the builder contract
(``api``) and registry, the runner with its backends, the work dir, pack, provenance."""
