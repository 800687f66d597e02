from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["web"])
PAGE = Path(__file__).parent / "static" / "index.html"


@router.get("/", response_class=HTMLResponse)
async def index() -> HTMLResponse:
    """The chat page: one self-contained file; the conversation lives in the browser only."""
    return HTMLResponse(PAGE.read_text())
