"""Visual search over an index of embedded images.

    index.py    embed a collection into an index directory of chunk files, checked on read and write
    query.py    `Index`: load an index and search it with query images or vectors
    topk.py     exact top-k: over the device mesh, or on the host for a CPU backend
    ann.py      approximate top-k (faiss HNSW on CPU)
    cluster.py  k-means of an index's images, scored against its labels, with contact sheets
    gallery.py  HTML pages of search results and clusters

`python -m jaxembed.search` runs the search command (`jaxembed.cli.search`).
"""
