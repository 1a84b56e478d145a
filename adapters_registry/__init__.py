"""loragate adapter registry: immutable, verified adapter versions bound to their base model."""
