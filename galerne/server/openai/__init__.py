"""OpenAI's API dialect: wire types and the OpenAI-only routes."""
