"""Image downloads: the HTTPS adapter beside ``virt/`` (DownloadImage → a ``download`` job).

``request`` checks a call (pure), ``fetch`` runs one download with aiohttp, ``manager`` turns
calls into jobs under ``downloads.max_parallel``.
"""

from neurond.downloads.manager import DownloadManager
from neurond.downloads.request import DownloadRequest, check_request

__all__ = ["DownloadManager", "DownloadRequest", "check_request"]
