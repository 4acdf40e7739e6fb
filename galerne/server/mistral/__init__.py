"""Mistral's API dialect (La Plateforme): wire types and the Mistral-only routes."""
