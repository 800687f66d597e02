from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         409: "conflict_error", 429: "rate_limit_error", 503: "service_unavailable_error"}


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class HordeError(Exception):
    """An error on the AI Horde API, answered as the Horde does: {"message", "rc"} with its HTTP status."""

    def __init__(self, status: int, message: str, rc: str):
        super().__init__(message)
        self.status, self.message, self.rc = status, message, rc


def _horde(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _field(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if part != "body") or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HordeError)
    async def horde_error(_: Request, e: HordeError) -> JSONResponse:
        return JSONResponse({"message": e.message, "rc": e.rc}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        if _horde(request):
            errors = {_field(err["loc"]): err["msg"] for err in e.errors()}
            return JSONResponse({"message": "Input payload validation failed", "errors": errors}, status_code=400)
        problems = [f"{_field(err['loc'])}: {err['msg']}" for err in e.errors()]
        first = _field(e.errors()[0]["loc"]) if e.errors() else None
        return JSONResponse(APIError(400, "; ".join(problems), first, "invalid_value").body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        if _horde(request):
            return JSONResponse({"message": str(e.detail), "rc": "NotFound" if e.status_code == 404 else "Error"},
                                status_code=e.status_code)
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)
