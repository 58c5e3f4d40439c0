"""The structured output the `facts` agent may be asked for (named in agents.yaml's `outputs:`)."""

from pydantic import BaseModel, Field


class Summary(BaseModel):
    title: str = Field(min_length=1, max_length=200)
    points: int = Field(ge=1, le=20)
