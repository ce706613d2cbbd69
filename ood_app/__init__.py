"""The bridge from an Open OnDemand session to the portal: launch (the portal in the session's job, connection.json
for notebooks, and the cleanup when it ends), and site.rb, which the app's ERB files load. ood_app imports portal,
never the other way round (tests/test_layers.py)."""
