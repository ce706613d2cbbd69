"""The bridge from an Open OnDemand session to the portal: launch (the portal in the session's job, and the
cleanup when it ends), connection.json for notebooks, and site.rb, which the app's ERB files load."""
