"""The event index: every feed entry of every worker, searchable without reading the feeds.

:mod:`decnet.events.query` (pure) parses ``decnet-admin events`` filters and
builds their SQL, and turns one feed line into one index row;
:mod:`decnet.events.index` (blocking) keeps ``<ingest>/events.sqlite`` and
queries it; :mod:`decnet.events.indexer` is the process that keeps the index
up to the feeds (started by the feed process).  See docs/Events.md.
"""
