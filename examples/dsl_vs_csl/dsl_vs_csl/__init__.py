"""dsl_vs_csl: a Flower App running splitflower's DSL or CSL split learning."""
