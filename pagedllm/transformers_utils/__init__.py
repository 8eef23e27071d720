"""Reading a model's config and tokenizer (the only places that know about transformers)."""
