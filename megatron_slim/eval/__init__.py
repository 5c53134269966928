"""Model evaluation: LM loss, perplexity, next-token accuracy and MTP speculative acceptance at any layout."""
